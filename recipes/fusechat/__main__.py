"""python -m recipes.fusechat ... = python -m recipes fuse ... (the Makefile's `make fuse`)."""
import sys

from recipes.fusechat import main

sys.exit(main(sys.argv[1:]))
