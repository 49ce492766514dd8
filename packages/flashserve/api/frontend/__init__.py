"""What every endpoint shares between its protocol and the engine (see docs/DESIGN.md)."""
