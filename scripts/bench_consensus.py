"""One DPPF consensus round vs one flat all-reduce vs accelerate's LocalSGD averaging (see `hf-dppf bench --help`).

    python scripts/bench_consensus.py                 # BERT-base, 2 gloo processes, 7 repeats
    python scripts/bench_consensus.py --output bench.md
"""

import sys

from hf_dppf.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
