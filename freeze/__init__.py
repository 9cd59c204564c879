"""Freeze decisions: pure maths and small engine objects, shared by the PS (central
decisions) and the workers (votes). Depends on torch and nothing of this project's but
itself, so ps/ and worker/ can both stand on it without standing on each other."""
