"""Trial stages: plain functions with typed inputs and outputs. None of them imports Ray."""
