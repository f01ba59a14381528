"""The export pipeline, load → merge → graphs → precision → parity gate → bundle: one
skeleton (`pipeline.py`) with two uses, one component (`component.py`, `--encoder` /
`--decoder`) and the audio LLM (`lalm.py`, `--lalm`); their options (`options.py`) and the
manifest they write (`manifest.py`)."""
