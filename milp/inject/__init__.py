"""Memory injectors and the machinery they share."""
