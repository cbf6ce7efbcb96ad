"""Fuzzing of every parser of untrusted bytes (atheris + libFuzzer): see fuzz/README.md."""
