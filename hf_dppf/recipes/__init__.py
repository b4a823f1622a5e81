"""
What the runnable scripts in the repository's `recipes/` folder are built from, kept next to their name so that a
reader of a recipe knows where its imports live:

- `common.py`: parsing with recipe defaults, logging, the end of a run (save, evaluate, `results.json`, summary);
- `data.py`: real datasets that installed packages ship (BBC News, digits, an MNIST sample), so recipes, the
  `hf-dppf sharpness` command and the tests run offline;
- `metrics/`: `evaluate` metric modules loaded by local path (offline);
- `sam.py`: SAM, the sharpness-aware reference the recipes run next to DPPF (`--sam_rho`). It is a baseline built on
  `DPPFTrainer`, not a way into the engine, so it lives here rather than among the integrations.

Imports: `hf_dppf.integrations.trainer` and `hf_dppf.engine`'s stats; nothing in the library imports this package
except the CLI, for the offline datasets of `data.py`. This `__init__` imports nothing, so `hf_dppf.recipes.data`
loads without transformers' `Trainer`.
"""
