"""The supervisor and the per-user loops that apply tasks."""
