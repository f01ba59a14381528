import sys

from lalm_export.demo.run import main

sys.exit(main())
