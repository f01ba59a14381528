"""The parity gate: every bound in one table (`bounds.py`), the comparison and its report
(`report.py`), and the gate of a component (`component.py`) and of an audio LLM (`lalm.py`),
on the speech-like clips of `signals.py`."""
