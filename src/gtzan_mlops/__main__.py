import sys

from gtzan_mlops.cli import main

sys.exit(main())
