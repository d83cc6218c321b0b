"""Under pytest started in the repository root (`python -m pytest` puts the root first on `sys.path`),
import Hugging Face's `kernels` package before anything looks for it: the root's `kernels/` folder
(installed as `fastdrag.kernels`) would shadow it (`fastdrag._checkout_path`)."""
from fastdrag._checkout_path import import_hub_kernels

import_hub_kernels()
