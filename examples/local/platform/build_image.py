"""Builds the example platform's "image": its programs copied into MLCI_IMAGE_DIR."""

import hashlib
import json
import os
import shutil
from pathlib import Path

here = Path(__file__).parent
target = Path(os.environ["MLCI_IMAGE_DIR"])
manifest = {}
for source in sorted(here.glob("*.py")):
    shutil.copy2(source, target / source.name)
    manifest[source.name] = hashlib.sha256(source.read_bytes()).hexdigest()
(target / "manifest.json").write_text(json.dumps(manifest, indent=1))
print(f"built {len(manifest)} files into {target}")
