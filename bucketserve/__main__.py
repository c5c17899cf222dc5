import sys

from bucketserve.cli import main

sys.exit(main())
