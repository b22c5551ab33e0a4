"""The page at `/` in real headless Chromium (Debian's chromium and chromium-driver, driven by
selenium): type a prompt, generate with the bundled model (Ctrl+Enter), see the progress and a
step preview, the images in the gallery, still there after a reload; use an image's settings;
drop an A1111 PNG to load its settings; img2img from an uploaded file, then inpainting with the
mask brush; a refused request shown on the page. Screenshots go to the test's folder; the console must stay free of errors.

`python3 quickstart.py test` installs chromium where it is missing and apt can (CI runs as
root); elsewhere without chromium this test skips, saying why. On CI it fails instead."""

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image, PngImagePlugin
from serve_helpers import ServerProcess, png_b64

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
if CHROMIUM is None or DRIVER is None:
    reason = (
        "needs headless Chromium and its driver (apt-get install chromium chromium-driver; "
        "`python3 quickstart.py test` does that as root)"
    )
    if os.environ.get("CI"):
        raise RuntimeError(f"CI must run the browser test: {reason}")
    pytest.skip(reason, allow_module_level=True)
selenium = pytest.importorskip("selenium", reason="needs selenium (the test extra)")

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

PROMPT = "a red circle above a blue square"
STEPS = 40  # enough for a few progress events between the first step and the end


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    process = ServerProcess(tmp_path_factory.mktemp("page"), "--steps", "6", "--max-batch", "4")
    yield process
    assert process.stop() == 0, process.log()


@pytest.fixture(scope="module")
def browser():
    options = Options()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
        "--window-size=1280,1000", "--no-first-run", "--disable-extensions",
    ):  # fmt: skip
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


def errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


SHOTS = {}  # where a failing wait leaves its screenshot


def wait(driver, condition, timeout=90, what=""):
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)
    except TimeoutException:
        shot = SHOTS.get("folder")
        if shot is not None:
            driver.save_screenshot(str(shot / "failed.png"))
        message = driver.find_element(By.ID, "message").text
        raise AssertionError(
            f"waited {timeout} s for {what or 'a condition'}; the page says {message!r}; "
            f"console: {driver.get_log('browser')}"
        ) from None


def loaded_images(driver, selector: str) -> int:
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])]"
        ".filter(i => i.complete && i.naturalWidth > 0).length",
        selector,
    )


WATCH = """
window.seen = {progress: [], previews: 0};
new MutationObserver(() => {
  for (const p of document.querySelectorAll('#jobs progress')) window.seen.progress.push(p.value);
  for (const i of document.querySelectorAll('#jobs img.preview')) {
    if (!i.hidden && i.src.startsWith('data:image/png')) window.seen.previews++;
  }
}).observe(document.getElementById('jobs'), {subtree: true, childList: true, attributes: true});
"""


def test_the_page_generates_shows_progress_keeps_history_and_reads_pngs(server, browser, tmp_path):
    d = browser
    SHOTS["folder"] = tmp_path
    d.get(server.url + "/")
    wait(d, lambda d: d.find_element(By.ID, "status").text == "ready", what="the page's start")
    assert "sd3_shapes" in d.find_element(By.ID, "model").text
    assert d.find_element(By.ID, "steps").get_attribute("value") == "6"  # the server's default

    # type a prompt and generate with Ctrl+Enter
    prompt = d.find_element(By.ID, "prompt")
    prompt.send_keys(PROMPT)
    for field, value in (("steps", STEPS), ("batch", 2), ("seed", 1234)):
        d.find_element(By.ID, field).clear()
        d.find_element(By.ID, field).send_keys(str(value))
    d.execute_script(WATCH)
    prompt.send_keys(Keys.CONTROL, Keys.ENTER)
    card = wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#jobs .job-card"), what="a job")[0]
    wait(d, lambda d: d.execute_script("return window.seen.previews") > 0, what="a preview")
    d.save_screenshot(str(tmp_path / "1-progress.png"))
    wait(d, lambda d: card.get_attribute("data-state") == "done", what="the job's end")
    wait(d, lambda d: loaded_images(d, "#jobs img.result") == 2, what="the results")
    seen = d.execute_script("return window.seen")
    assert any(0 < v < 1 for v in seen["progress"]), seen["progress"]
    assert "done step 40/40" in card.text
    wait(d, lambda d: loaded_images(d, "#gallery .item img") == 2, what="the gallery")
    d.save_screenshot(str(tmp_path / "2-done.png"))

    # reload: the history is still there
    d.refresh()
    wait(d, lambda d: loaded_images(d, "#gallery .item img") == 2, what="the gallery again")
    items = d.find_elements(By.CSS_SELECTOR, "#gallery .item")
    assert all(PROMPT in i.find_element(By.TAG_NAME, "img").get_attribute("alt") for i in items)
    assert "2 images" in d.find_element(By.ID, "history-count").text
    d.save_screenshot(str(tmp_path / "3-reloaded.png"))

    # an image's settings, then "use these settings"
    items[1].click()  # newest first: the second is seed 1234
    wait(d, lambda d: d.find_element(By.ID, "detail").get_attribute("open") is not None)
    assert "1234" in d.find_element(By.ID, "detail-settings").text
    d.save_screenshot(str(tmp_path / "4-detail.png"))
    d.find_element(By.ID, "prompt").clear()
    d.find_element(By.ID, "use-settings").click()
    assert d.find_element(By.ID, "prompt").get_attribute("value") == PROMPT
    assert d.find_element(By.ID, "seed").get_attribute("value") == "1234"
    assert d.find_element(By.ID, "steps").get_attribute("value") == str(STEPS)

    # the random seed button
    d.find_element(By.ID, "random-seed").click()
    assert int(d.find_element(By.ID, "seed").get_attribute("value")) not in (-1, 1234)

    # drop a PNG made by A1111: its settings fill the form
    info = PngImagePlugin.PngInfo()
    info.add_text(
        "parameters",
        "a green triangle\nNegative prompt: blurry\nSteps: 12, Sampler: Euler a, CFG scale: 3.5, "
        "Seed: 99, Size: 128x128, Model: sd_xl_base_1.0",
    )
    drop(d, png_b64(Image.new("RGB", (32, 32)), pnginfo=info), "a1111.png", "body")
    wait(d, lambda d: d.find_element(By.ID, "prompt").get_attribute("value") == "a green triangle")
    values = {f: d.find_element(By.ID, f).get_attribute("value")
              for f in ("negative", "steps", "cfg", "seed", "sampler")}  # fmt: skip
    assert values == {"negative": "blurry", "steps": "12", "cfg": "3.5", "seed": "99",
                      "sampler": "euler_ancestral"}  # fmt: skip
    assert "a1111" in d.find_element(By.ID, "message").text
    # ... and one made by sd3, through the file input
    first = server.outputs / items[0].get_attribute("data-name")
    d.find_element(By.ID, "load-png").send_keys(str(first))
    wait(d, lambda d: d.find_element(By.ID, "prompt").get_attribute("value") == PROMPT)
    assert json.loads(Image.open(first).text["sd3"])["settings"]["seed"] == int(
        d.find_element(By.ID, "seed").get_attribute("value")
    )

    # img2img from an uploaded file
    init = tmp_path / "init.png"
    Image.new("RGB", (128, 128), (20, 160, 40)).save(init)
    d.find_element(By.ID, "init-image").send_keys(str(init))
    wait(d, lambda d: d.find_element(By.ID, "init-thumb").get_attribute("src").startswith("data:"))
    for field, value in (("steps", 6), ("denoise", 0.5)):
        d.find_element(By.ID, field).clear()
        d.find_element(By.ID, field).send_keys(str(value))
    d.find_element(By.ID, "generate").click()
    # (the reload emptied the jobs column)
    newest = wait(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#jobs .job-card"), what="a card")[
        0
    ]
    wait(d, lambda d: newest.get_attribute("data-state") == "done", what="the img2img job")
    wait(d, lambda d: loaded_images(d, "#gallery .item img") == 3, what="three in the gallery")
    d.save_screenshot(str(tmp_path / "5-img2img.png"))
    assert errors(d) == []

    # inpainting: paint a stroke down the left of the image with the mask brush
    canvas = d.find_element(By.ID, "mask-canvas")
    wait(d, lambda d: canvas.is_displayed(), what="the mask brush")
    assert canvas.size["width"] == 128  # shown at the image's size
    d.find_element(By.ID, "denoise").clear()
    d.find_element(By.ID, "denoise").send_keys("1")
    d.find_element(By.ID, "mask-blur").clear()
    d.find_element(By.ID, "mask-blur").send_keys("0")
    ActionChains(d).move_to_element_with_offset(canvas, -44, -60).click_and_hold().move_by_offset(
        0, 60
    ).move_by_offset(0, 60).release().perform()  # x = 20 of 128, top to bottom
    d.save_screenshot(str(tmp_path / "6-brush.png"))
    d.find_element(By.ID, "generate").click()
    wait(d, lambda d: loaded_images(d, "#gallery .item img") == 4, what="the inpainted image")
    newest = d.find_element(By.CSS_SELECTOR, "#gallery .item").get_attribute("data-name")
    stored = json.loads(Image.open(server.outputs / newest).text["sd3"])["settings"]
    assert stored["inpaint"] is not None and stored["inpaint"]["mask_blur"] == 0
    inpainted = np.asarray(Image.open(server.outputs / newest).convert("RGB"), np.int16)
    assert (inpainted[:, 48:] == (20, 160, 40)).all()  # unpainted: the input's pixels
    assert np.abs(inpainted[:, 16:24] - (20, 160, 40)).mean() > 10  # painted: repainted
    d.save_screenshot(str(tmp_path / "7-inpainted.png"))
    assert errors(d) == []

    # a request the server refuses: its reason on the page
    d.find_element(By.ID, "clear-init").click()
    d.find_element(By.ID, "width").clear()
    d.find_element(By.ID, "width").send_keys("100")
    d.find_element(By.ID, "generate").click()
    wait(d, lambda d: "width" in d.find_element(By.ID, "message").text, what="the refusal")
    d.save_screenshot(str(tmp_path / "8-refused.png"))
    # the only console line: the browser's own note of the 422
    assert all("422" in e for e in errors(d)), errors(d)
    print(f"screenshots in {tmp_path}")


def drop(driver, png: str, name: str, target: str) -> None:
    """A real drop event carrying a PNG file, as a person dragging one onto the page makes."""
    driver.execute_script(
        """
        const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));
        const data = new DataTransfer();
        data.items.add(new File([bytes], arguments[1], {type: 'image/png'}));
        const target = document.querySelector(arguments[2]);
        for (const type of ['dragenter', 'dragover', 'drop']) {
          target.dispatchEvent(new DragEvent(type, {bubbles: true, cancelable: true, dataTransfer: data}));
        }
        """,
        png,
        name,
        target,
    )


def test_the_page_asks_for_the_key_when_the_server_has_one(tmp_path, browser):
    key = "page-test-key-123"
    server = ServerProcess(tmp_path, "--api-key", key, "--steps", "4", "--no-previews")
    try:
        d = browser
        SHOTS["folder"] = tmp_path
        d.get(server.url + "/")
        d.execute_script("localStorage.clear()")
        d.refresh()
        form = wait(d, lambda d: d.find_element(By.ID, "key-form"))
        wait(d, lambda d: form.is_displayed(), what="the key form")
        d.find_element(By.ID, "api-key").send_keys(key)
        d.find_element(By.CSS_SELECTOR, "#key-form button").click()
        wait(d, lambda d: d.find_element(By.ID, "status").text == "ready")
        d.find_element(By.ID, "prompt").send_keys("a yellow star")
        d.find_element(By.ID, "generate").click()
        wait(d, lambda d: loaded_images(d, "#gallery .item img") == 1, what="an image with the key")
        src = d.find_element(By.CSS_SELECTOR, "#gallery .item img").get_attribute("src")
        assert src.startswith("blob:")  # fetched with the key
        d.save_screenshot(str(tmp_path / "keyed.png"))
        assert all("401" in e for e in errors(d)), errors(d)  # only the first, keyless tries
        d.execute_script("localStorage.clear()")
    finally:
        assert server.stop() == 0
