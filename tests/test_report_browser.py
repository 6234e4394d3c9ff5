"""The HTML report in a real browser: headless Chromium renders it, the text is there, the embedded plots
are drawn (their line colours appear in a screenshot) and the verdict matrix is coloured.

Slow-marked: it needs Debian's ``chromium``, which ``.ci/run`` installs before the slow tests; without it
the test is skipped.
"""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from relapse.report import build_report
from tests.test_report import _write, make_results

BROWSER = next(
    (shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)),
    None,
)
HEADLESS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]


def _pixels_near(image: np.ndarray, rgb: tuple[int, int, int], tolerance: int = 12) -> int:
    return int((np.abs(image[..., :3].astype(int) - np.array(rgb)).max(axis=-1) <= tolerance).sum())


@pytest.mark.slow
@pytest.mark.skipif(BROWSER is None, reason="no Chromium here (.ci/run installs Debian's chromium)")
def test_the_report_renders_in_a_headless_browser(tmp_path):
    import matplotlib.image

    _write(tmp_path, make_results())
    page = build_report(tmp_path)["report.html"].resolve()
    shot = tmp_path / "screenshot.png"
    taken = subprocess.run(
        [BROWSER, *HEADLESS, "--window-size=1280,5000", f"--screenshot={shot}", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert taken.returncode == 0 and shot.is_file(), taken.stderr[-2000:]
    image = (matplotlib.image.imread(shot) * 255).astype(np.uint8)
    assert image.shape[1] == 1280
    # matplotlib's first line colour (C0, #1f77b4) is nowhere in the page's own style: it can only come
    # from the embedded plots, drawn.
    assert _pixels_near(image, (0x1F, 0x77, 0xB4)) > 200
    # ga relapses under rtn-w4-g128: its cell in the at-a-glance matrix is painted (td.relapses).
    assert _pixels_near(image, (0xF5, 0xB7, 0xB1), tolerance=3) > 500

    dom = subprocess.run(
        [BROWSER, *HEADLESS, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    for text in (
        "Did my model really forget, or will it relapse?",
        "At a glance (knowmem_forget)",
        "No, it will relapse: rtn-w4-g128 brings back 62% of the knowmem_forget gap",
        '<td class="relapses">relapses 62%</td>',
    ):
        assert text in dom.stdout, text
    assert dom.stdout.count('src="data:image/png;base64,') == 3
