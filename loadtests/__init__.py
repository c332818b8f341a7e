"""Load tests of scoring endpoints (locust); see README.md."""
