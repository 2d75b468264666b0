"""``python -m lap_pkcs11``: the same as the ``lap-pkcs11`` command."""

import sys

from lap_pkcs11.entry import main

sys.exit(main())
