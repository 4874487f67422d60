"""What mtmm keeps between runs, under one cache folder ($MTMM_CACHE, else ~/.cache/mtmm): generated datasets
(data/shapes.py), each split's decoded images (images.py) and frozen encoders' outputs (features.py), every entry
named by what its contents depend on (keys.py); `mtmm-cache` (cli.py) lists and prunes them."""
