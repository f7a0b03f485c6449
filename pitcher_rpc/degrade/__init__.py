"""Graceful degradation: pure, sans-IO policies for failing and overloaded backends."""
