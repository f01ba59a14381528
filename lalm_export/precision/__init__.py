"""`--precision`: one row per precision (`specs.py`) and the graph transforms that make it
(int8 and fp16 in `transforms.py`, int4 in `int4.py` with GPTQ's weights from `gptq.py`)."""
