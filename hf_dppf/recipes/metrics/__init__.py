"""
`evaluate` metric modules shipped with hf_dppf, so that the recipes' default metrics load offline.

`evaluate.load(name)` fetches a metric script from the Hub; `evaluate.load(path)` runs a local one. The recipes load
`ACCURACY` (this folder's `accuracy.py`) unless `--metric` names another local script or, online, a Hub metric.
"""

from pathlib import Path

ACCURACY = str(Path(__file__).with_name("accuracy.py"))
