"""Files: reading and writing images and frame folders, and the one way this project writes a file
or a folder (atomic_path): under a temporary sibling name, moved into place once complete, so an
interrupted run never leaves a half-written image, video, checkpoint or report behind."""

import os
import shutil
import uuid

import cv2
import numpy as np

# ---------------------------------------------------------------------------------------------
# The atomic write


class atomic_path:
    """The one way this project writes a file or folder: to a temporary sibling,
    <root>.tmp-<8 hex digits><ext> (the extension kept: encoders choose by it; ext=False: none, a
    folder), fsynced and moved into place once complete: `with atomic_path(path) as tmp:` (deleted
    on an exception), or a.tmp, a.commit() / a.discard()."""

    TAG = ".tmp-"  # in every temporary's name: a killed run's leftovers are known by it

    def __init__(self, path, ext=True):
        self.path = os.fspath(path)
        root, suffix = os.path.splitext(self.path)
        self.tmp = f"{root}{self.TAG}{uuid.uuid4().hex[:8]}{suffix if ext else ''}"

    def commit(self):
        if os.path.isfile(self.tmp):
            with open(self.tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(self.tmp, self.path)

    def discard(self):
        if os.path.isdir(self.tmp):
            shutil.rmtree(self.tmp, ignore_errors=True)
        elif os.path.exists(self.tmp):
            os.remove(self.tmp)

    def __enter__(self):
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self.commit()
        finally:
            self.discard()  # a no-op once committed


# ---------------------------------------------------------------------------------------------
# Images and frame folders

IMG_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def read_image(path):
    """RGB uint8 (h, w, 3). Grey images are expanded to three channels, 16-bit ones reduced to 8."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {path}")
    bgr = cv2.imread(path, cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"cannot decode image (corrupt or unsupported): {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def write_image(path, rgb, compression=3):
    """Write an RGB uint8 image atomically (PNG compression level 0-9 for .png)."""
    ext = os.path.splitext(path)[1].lower()
    params = [cv2.IMWRITE_PNG_COMPRESSION, int(compression)] if ext == ".png" else []
    ok, buf = cv2.imencode(
        ext, np.ascontiguousarray(rgb[..., ::-1] if rgb.ndim == 3 else rgb), params
    )
    if not ok:
        raise ValueError(f"cannot encode image as {ext}: {path}")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(buf.tobytes())


def list_frames(folder):
    """Sorted paths of the images in `folder`, a clip's frames."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"folder not found: {folder}")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMG_EXTS))
    if not names:
        raise ValueError(f"no image frames in folder: {folder}")
    return [os.path.join(folder, n) for n in names]
