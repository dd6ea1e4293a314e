"""The model locator and downloader's command line, as the image's build
runs it to bake a model in:

    python3 utils.py download ORG/NAME[@REVISION] [--into DIR]

The code is `encrypted_vllm.worker.models`."""

import sys

from encrypted_vllm.worker.models import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
