"""The built-in example (`python -m lalm_export.demo`, `make demo`) and what it is made of:
tiny random checkpoints, the DTMF and spoken-digit tasks, and the LALM training loop."""
