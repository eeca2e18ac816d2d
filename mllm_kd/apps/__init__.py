"""Applications built on the library (not part of it): each one a job run end to end with the library."""
