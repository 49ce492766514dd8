"""Engine tokens -> text: the output owner and the pieces it uses."""
