"""
How users run DPPF: the ways into the engine from Accelerate, the Hugging Face `Trainer` and DeepSpeed.

- `accelerate.py`: `DPPF`, the context manager for a plain Accelerate loop;
- `trainer.py`: `DPPFTrainer` and `DPPFTrainingArguments`, DPPF for `Trainer` scripts behind one flag;
- `deepspeed.py`: replica groups (ZeRO inside a replica, DPPF across replicas) and `DeepSpeedDPPF`, the engine over
  ZeRO's shards; usable from a plain DeepSpeed loop, and the layer `DPPFTrainer` runs under DeepSpeed;
- `arguments.py`: `DPPFArguments`, the `--dppf` flags for any `HfArgumentParser` script (`DPPFTrainingArguments`
  adds them to `TrainingArguments`);
- `common.py`: the helpers every integration shares (push schedule, DDP silencing, optimizer unwrapping, resets after
  a round, one worker's resume files in a checkpoint).

Imports: `hf_dppf.config`, `hf_dppf.strategies` and `hf_dppf.engine` (data flows config -> engine <- integrations),
and within this package only the shared layers `common.py`, `arguments.py` and `deepspeed.py`. `accelerate.py` and
`trainer.py` never import one another; the shared layers import no integration. Nothing here does the update math:
that is the engine's. `hf_dppf` loads `DPPF`, `DPPFTrainer` and `DPPFTrainingArguments` from here on first use.
"""
