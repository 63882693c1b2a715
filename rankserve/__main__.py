import sys

from rankserve.cli.main import main

sys.exit(main())
