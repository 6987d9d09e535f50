import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmark_fixtures import rhb_data  # noqa: E402,F401

from hitq.benchmark import render, tables  # noqa: E402


def test_parse_rows_formats(rhb_data):
    csv_rows = render.parse_rows(tables.read_table(rhb_data, "csv", "employment-table01"), "csv")
    html_rows = render.parse_rows(tables.read_table(rhb_data, "html", "employment-table01"), "html")
    md_rows = render.parse_rows(tables.read_table(rhb_data, "markdown", "employment-table01"), "markdown")
    for rows in (csv_rows, html_rows, md_rows):
        assert len(rows) > 50 and len({len(r) for r in rows}) == 1  # rectangular
        assert any("1953" in c for r in rows for c in r)
    assert render.parse_rows("a,b\n1,\n", "csv") == [["a", "b"], ["1", ""]]
    # empty padding columns on the right are dropped
    assert render.parse_rows('"x","",""\n"1","",""\n', "csv") == [["x"], ["1"]]


def test_render_is_deterministic_and_capped(rhb_data, tmp_path):
    text = tables.read_table(rhb_data, "csv", "employment-table01")
    a = render.render_table_png(text, "csv", tmp_path / "a.png")
    b = render.render_table_png(text, "csv", tmp_path / "b.png")
    assert a.read_bytes() == b.read_bytes()
    with Image.open(a) as im:
        assert im.format == "PNG" and im.size[0] > 500 and im.size[1] > 500
        assert max(im.size) <= render.MAX_SIDE
        colors = im.getcolors(maxcolors=1 << 16)
        assert colors is not None and len(colors) > 2  # text and grid, not a blank canvas
    big = render.render_table_png(tables.table_path(rhb_data, "csv", "society-table25"), "csv", tmp_path / "c.png")
    with Image.open(big) as im:
        assert max(im.size) <= render.MAX_SIDE


def test_ensure_images_replaces_pointers(rhb_data, tmp_path):
    data = tmp_path / "data"
    (data / "csv").mkdir(parents=True)
    (data / "image").mkdir()
    for name in ("employment-table01", "labor-table01"):
        (data / "csv" / f"{name}.csv").write_bytes(tables.table_path(rhb_data, "csv", name).read_bytes())
        (data / "image" / f"{name}.png").write_bytes(tables.image_path(rhb_data, name).read_bytes())
    assert tables.is_lfs_pointer(data / "image" / "employment-table01.png")
    written = render.ensure_images(data, ["employment-table01", "labor-table01", "employment-table01"])
    assert written == [data / "image" / "employment-table01.png", data / "image" / "labor-table01.png"]
    assert tables.check_image(data, "employment-table01") == written[0]
    assert render.ensure_images(data, ["employment-table01"]) == []  # real PNGs are kept
    assert render.ensure_images(data, ["no-such-table"]) == []
