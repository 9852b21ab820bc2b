"""Tests of the Ollama emulator (``usher.emulator``)."""
