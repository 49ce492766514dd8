"""HTTP plumbing every endpoint shares: body parsing, error shapes, server-sent events."""
