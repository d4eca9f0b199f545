"""`python -m datasets.synthetic ...`: the generator's command line (generate.py)."""
import sys

from datasets.synthetic.generate import main

sys.exit(main())
