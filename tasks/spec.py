"""Reading the platform spec from disk: the one piece of I/O between a path and the model."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from sizing.images import Image, ImageListError, parse_images
from sizing.spec import PlatformSpec
from sizing.validate import parse_spec

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SPEC = "deployments/lab/platform.yaml"


def resolve_spec_path(spec_path: str | Path) -> Path:
    """A relative path is taken from the working directory, else from the project root.

    Deployments run from the project root; the fallback lets a phase started from
    elsewhere (a test, a shell in another directory) find the embedded specs.
    """
    path = Path(spec_path)
    if path.is_absolute() or path.exists():
        return path
    candidate = PROJECT_ROOT / path
    return candidate if candidate.exists() else path


def read_spec(spec_path: str | Path, users: int | None = None) -> PlatformSpec:
    """Read and validate a spec file; raises SpecError (every problem with its line)."""
    path = resolve_spec_path(spec_path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"platform spec {path} does not exist (working directory "
                                f"{Path.cwd()})") from None
    return parse_spec(text, source=str(path), users=users)


@task(name="load-spec", retries=0)
def load_spec(spec_path: str) -> PlatformSpec:
    """Validate the spec before any phase acts: a bad spec fails the run at once."""
    return read_spec(spec_path)


def read_images(path: str | Path) -> list[Image]:
    """The release's images list (`images.txt` beside the spec); a missing or unreadable
    file says so, naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ImageListError(f"{path}: no such images list") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ImageListError(f"{path}: cannot read the images list: {error}") from None
    return parse_images(text, str(path))
