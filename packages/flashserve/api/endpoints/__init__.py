"""One module set per API (chat now): its protocol, its rules, its formatter."""
