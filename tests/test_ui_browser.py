"""The MLflow UI as a person sees it: headless Chromium on `flows.py ui` over a store a training flow run filled."""

import re
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient
from PIL import Image
from selenium import webdriver
from selenium.common.exceptions import (
    ElementClickInterceptedException,
    ElementNotInteractableException,
    NoSuchElementException,
    StaleElementReferenceException,
    TimeoutException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

import flows
from pipeline.config import load_config
from tests.conftest import PROJECT_ROOT, needs_data, required, serving

pytestmark = pytest.mark.usefixtures("prefect_server")

# Debian's packages `chromium` and `chromium-driver`; `make browser` (a step of `make test`) installs them.
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    # Without these the browser keeps calling home, and a closed network refuses its connections.
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--lang=en-US", "--window-size=1400,1100",
]
WAIT_SECONDS = 300  # for each piece of content; on an idle machine each shows within a few seconds
SCREENSHOTS_DIR = PROJECT_ROOT / "outputs" / "screenshots"  # where people look at the latest screenshots

TINY = {
    "data.train_subset": 300, "data.validation_size": 200, "model.hidden_dims": [32], "model.latent_dim": 2,
    "eval.iwae_samples": 2, "eval.fid": False, "train.epochs": 2, "train.device": "cpu",
}
PICTURES = ["latent_manifold.png", "latent_space.png", "loss_curves.png", "reconstructions.png", "samples"]
PREVIEWED_PICTURE = "reconstructions.png"


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    """Debian's Chromium, headless with a new empty profile, driven through Debian's chromedriver."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.is_file()]
    if missing:
        why = (
            f"needs Debian's chromium and chromium-driver, and {' and '.join(missing)} is missing: install them as "
            "root with `make browser` or `apt-get install chromium chromium-driver`"
        )
        if required("VAE_REQUIRE_BROWSER"):
            pytest.fail(f"the browser test {why} (CI or VAE_REQUIRE_BROWSER requires it)", pytrace=False)
        pytest.skip(why)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"]:
        options.add_argument(flag)
    # With the driver's path given, Selenium never runs Selenium Manager, which would try to download one.
    service = Service(executable_path=str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(browser: WebDriver, condition: Callable[[WebDriver], Any], what: str) -> Any:
    """``condition``'s first truthy value, retried while the page renders; fails naming ``what`` and the page's text.

    An element that is not there yet, is replaced by a new render or is covered or inactive counts as not yet.
    """
    not_yet = [
        NoSuchElementException, StaleElementReferenceException,
        ElementClickInterceptedException, ElementNotInteractableException,
    ]
    try:
        return WebDriverWait(browser, WAIT_SECONDS, ignored_exceptions=not_yet).until(condition)
    except TimeoutException:
        text = browser.find_element(By.TAG_NAME, "body").text
        pytest.fail(
            f"the MLflow UI did not show {what} within {WAIT_SECONDS} s; {browser.current_url} shows:\n{text[:3000]}"
        )


def click(browser: WebDriver, xpath: str, what: str) -> None:
    """Click the element at ``xpath`` as soon as it takes the click."""

    def clicked(browser: WebDriver) -> bool:
        browser.find_element(By.XPATH, xpath).click()
        return True

    wait_for(browser, clicked, what)


def route(browser: WebDriver) -> str:
    """The UI's route, without its query: "/experiments/1/runs" for http://host/#/experiments/1/runs?searchFilter=."""
    return browser.current_url.partition("#")[2].partition("?")[0]


def metric_names_shown(browser: WebDriver) -> set[str]:
    """The names in the run page's metrics table (each links to the run's model metrics charts)."""
    links = "document.querySelectorAll('a[href$=\"/model-metrics\"]')"
    return set(browser.execute_script(f"return Array.from({links}, link => link.textContent)"))


def artifact_tree(browser: WebDriver) -> list[str]:
    """The names in the artifacts view's file tree, top to bottom (a folder's files after it once it is open)."""
    nodes = "document.querySelectorAll('[data-testid=\"artifact-tree-node\"]')"
    return browser.execute_script(f"return Array.from({nodes}, node => node.getAttribute('artifact-name'))")


def tree_node(name: str) -> str:
    """The XPath of the artifact ``name`` (a file or folder) in the artifacts view's file tree."""
    return f"//*[@data-testid='artifact-tree-node' and @artifact-name='{name}']"


def previewed_image_size(browser: WebDriver, name: str) -> tuple[int, int] | None:
    """The natural size of the preview <img> of artifact ``name`` once it has loaded, else None."""
    size = browser.execute_script(
        "const img = document.querySelector(`img[alt=\"${arguments[0]}\"]`);"
        "return img && img.complete && img.naturalWidth > 0 ? [img.naturalWidth, img.naturalHeight] : null",
        name,
    )
    return tuple(size) if size else None


def screenshot(browser: WebDriver, path: Path) -> Path:
    """The visible page as a PNG at ``path``, also copied into outputs/screenshots/ for people to look at."""
    assert browser.save_screenshot(str(path))
    SCREENSHOTS_DIR.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, SCREENSHOTS_DIR / path.name)
    return path


def assert_shows_a_rendered_page(png: Path, browser: WebDriver) -> None:
    with Image.open(png) as shot:
        assert shot.size == tuple(browser.execute_script("return [window.innerWidth, window.innerHeight]"))
        assert shot.convert("RGB").getcolors(maxcolors=256) is None  # text, icons and pictures: not a blank page


@pytest.fixture
def trained(mlflow_store: str) -> flows.TrainingOutcome:
    """One training flow run on tiny data, finished: the UI then reads a store that nothing writes any more."""
    return flows.train_flow(load_config("default", TINY))


@pytest.fixture
def mlflow_ui(trained: flows.TrainingOutcome, mlflow_store: str, tmp_path: Path) -> Iterator[str]:
    """The address of `python flows.py ui` over the test's store, once the flow run has filled it."""
    command = lambda port: [sys.executable, "flows.py", "ui", "--port", str(port)]  # noqa: E731
    environment = {"MLFLOW_TRACKING_URI": mlflow_store}
    with serving(command, ready_path="/health", log=tmp_path / "ui.log", env=environment) as server:
        yield server.url


@needs_data
def test_the_mlflow_ui_shows_the_experiment_the_run_its_metrics_and_pictures(browser, trained, mlflow_ui, tmp_path):
    outcome = trained
    client = MlflowClient()
    run = client.get_run(outcome.run_id)
    experiment = client.get_experiment(outcome.experiment_id)
    top_level_artifacts = [info.path for info in client.list_artifacts(outcome.run_id)]
    assert set(PICTURES) <= set(top_level_artifacts)
    with Image.open(client.download_artifacts(outcome.run_id, PREVIEWED_PICTURE, str(tmp_path))) as picture:
        picture_size = picture.size

    # As a person would: the address `flows.py ui` printed for the experiment, opened in a fresh browser, lands on the
    # experiment's runs (MLflow 3 would open its GenAI view otherwise); no click on "Model training".
    (address,) = re.findall(rf"^  {experiment.name} +(http://\S+)$", (tmp_path / "ui.log").read_text(), re.M)
    assert address == f"{mlflow_ui}/#/experiments/{outcome.experiment_id}/runs?workflowType=machine_learning"
    browser.get(address)
    click(browser, "//button[@data-component-id='mlflow.assistant.chat_panel.close']", "the assistant panel")
    runs_route = f"/experiments/{outcome.experiment_id}/runs"
    wait_for(browser, lambda b: route(b) == runs_route, f"the experiment's runs ({runs_route})")
    experiment_link = f"//a[@data-testid='experiment-link' and normalize-space()='{experiment.name}']"
    wait_for(browser, expected_conditions.visibility_of_element_located((By.XPATH, experiment_link)), experiment.name)
    run_link = f"//a[normalize-space()='{run.info.run_name}' and contains(@href, '/runs/{outcome.run_id}')]"
    click(browser, run_link, f"the run {run.info.run_name} in the experiment's runs")

    wait_for(browser, lambda b: route(b) == f"{runs_route}/{outcome.run_id}", "the run's page")
    metrics = set(run.data.metrics)
    wait_for(browser, lambda b: metric_names_shown(b) == metrics, f"the run's metrics {sorted(metrics)}")
    assert {"test_nll_nats", "val_elbo_nats"} <= metric_names_shown(browser)
    run_page = screenshot(browser, tmp_path / "mlflow-ui-run.png")

    click(browser, "//button[@role='tab' and normalize-space()='Artifacts']", "the run's Artifacts tab")
    wait_for(browser, lambda b: route(b) == f"{runs_route}/{outcome.run_id}/artifacts", "the run's artifacts view")
    wait_for(browser, lambda b: set(artifact_tree(b)) == set(top_level_artifacts), f"the files {top_level_artifacts}")
    click(browser, tree_node("samples"), "the samples folder")
    wait_for(browser, lambda b: "samples.gif" in artifact_tree(b), "samples/samples.gif")
    click(browser, tree_node(PREVIEWED_PICTURE), PREVIEWED_PICTURE)
    preview_size = wait_for(browser, lambda b: previewed_image_size(b, PREVIEWED_PICTURE), f"{PREVIEWED_PICTURE} shown")
    assert preview_size == picture_size
    artifacts_view = screenshot(browser, tmp_path / "mlflow-ui-artifacts.png")

    assert_shows_a_rendered_page(run_page, browser)
    assert_shows_a_rendered_page(artifacts_view, browser)
