"""Own data that would be misread in silence is read correctly or stopped with one line naming file, line, column
and value: quotes, cell counts, byte-order marks, duplicate columns, encodings, missing labels, image modes,
EXIF orientation, oversized images and a missing image folder. Every file is a few bytes made here."""

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mtmm.tasks import infer_classes, target_statistics
from mtmm.data.dataset import ManifestDataset, check_columns
from mtmm.tasks import TaskSpec
from mtmm.data.images import ImageTransform, to_rgb
from mtmm.data.readers import read_manifest
from mtmm.data.sources import manifest
from mtmm.errors import UserError

COLOUR = TaskSpec(name="colour", type="multiclass", target="colour", classes=("blue", "red"))


def write(path: Path, text: str) -> Path:
    path.write_bytes(text.encode("utf-8"))  # bytes: the line endings stay exactly as written
    return path


def error_of(call, *args, **kwargs) -> str:
    with pytest.raises(UserError) as error:
        call(*args, **kwargs)
    message = str(error.value)
    assert "\n" not in message  # one line
    return message


# --- CSV / TSV / JSONL -----------------------------------------------------------------------------------------

def test_quote_left_open_names_the_line_and_column_where_it_opens(tmp_path):
    rows = "".join(f"{i},text {i},red\n" for i in range(4, 10))
    path = write(tmp_path / "m.csv", 'id,text,colour\n1,fine,red\n2,"broken,blue\n' + rows)
    message = error_of(read_manifest, path)
    assert message.startswith(f"{path}, line 3, column 'text': the quote that opens the cell '\"broken,blue' is "
                              f"never closed")


def test_quote_closed_inside_a_later_cell_names_where_it_opens(tmp_path):
    path = write(tmp_path / "m.tsv", 'id\ttext\tcolour\n1\t"open\tred\n2\t"quoted"\tblue\n')
    message = error_of(read_manifest, path)
    assert message.startswith(f"{path}, line 2, column 'text': the quote that opens the cell '\"open\\tred' closes "
                              f"on line 3 with more text after it instead of tab")


def test_multi_line_cells_are_read_and_a_likely_merge_is_reported(tmp_path, caplog):
    path = write(tmp_path / "ok.csv", 'id,text,colour\r\n1,"two\r\nlines",red\r\n2,x,blue\r\n')
    with caplog.at_level(logging.WARNING):
        records = read_manifest(path)
    assert [(r["text"], r["_line"]) for r in records] == [("two\r\nlines", 2), ("x", 4)] and not caplog.records
    # The quote closes further down at the end of a cell: valid CSV, but each line would be a row by itself.
    path = write(tmp_path / "merged.csv", 'id,text,colour\n1,"open,red\n2,5 inch",blue\n3,x,red\n')
    with caplog.at_level(logging.WARNING):
        assert len(read_manifest(path)) == 2
    assert f"{path}, line 2: a quoted cell runs over several lines" in caplog.text


def test_quote_that_swallows_a_line_and_breaks_the_cell_count_is_named(tmp_path):
    path = write(tmp_path / "m.csv", 'id,text,colour\n1,"open,red\n2,5 inch",blue,x\n')
    assert error_of(read_manifest, path) == (
        f"{path}, line 2: 4 cells but the header has 3 columns; the quoted cell in column 'text' opens on line 2 "
        f"and runs on to line 3: is a quote left open there? ('open,red\\n2,5 inch')")


@pytest.mark.parametrize("row, problem", [
    ("2,short", "2 cells but the header has 3 columns; every row needs all 3 cells (empty ones as empty cells)"),
    ("2,a,b,red", "4 cells but the header has 3 columns; quote cells that contain comma"),
])
def test_row_with_another_number_of_cells_than_the_header(tmp_path, row, problem):
    path = write(tmp_path / "m.csv", f"id,text,colour\n1,fine,red\n\n{row}\n")
    assert error_of(read_manifest, path) == f"{path}, line 4: {problem}"


def test_blank_and_empty_rows_are_skipped_and_lines_still_counted(tmp_path):
    path = write(tmp_path / "m.csv", "\nid,colour\n1,red\n,\n   \n2,\n")
    assert [(r["id"], r["colour"], r["_line"]) for r in read_manifest(path)] == [("1", "red", 3), ("2", None, 6)]


@pytest.mark.parametrize("name, text", [("m.csv", "id,colour\n1,red\n"), ("m.tsv", "id\tcolour\n1\tred\n"),
                                        ("m.jsonl", '{"id": "1", "colour": "red"}\n')])
def test_utf8_byte_order_mark_is_accepted(tmp_path, name, text):
    records = read_manifest(write(tmp_path / name, "\ufeff" + text))
    assert {key: value for key, value in records[0].items() if not key.startswith("_")} == {"id": "1", "colour": "red"}


def test_duplicate_column_or_key_is_an_error(tmp_path):
    path = write(tmp_path / "m.csv", "id,colour,text,colour\n1,red,a,blue\n")
    assert error_of(read_manifest, path) == (f"{path}, line 1: the header names column 'colour' twice (columns 2 "
                                             f"and 4); rename one")
    path = write(tmp_path / "m.jsonl", '{"id": 1}\n{"id": 2, "colour": "red", "colour": "blue"}\n')
    assert error_of(read_manifest, path).startswith(f"{path}, line 2: key 'colour' appears twice")


def test_text_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "m.csv"
    path.write_bytes("id,text\n1,ok\n2,caf\xe9\n".encode("latin-1"))
    assert error_of(read_manifest, path) == (f"{path}, line 3: not UTF-8 text (byte e9 at position 6 of the line: "
                                             f"invalid continuation byte); save it as UTF-8 (Excel: 'CSV UTF-8')")
    path.write_bytes("id,text\n1,ok\n".encode("utf-16"))
    assert "it looks like UTF-16" in error_of(read_manifest, path)


def test_mapped_column_wins_over_a_file_column_of_the_same_name(tmp_path):
    path = write(tmp_path / "m.csv", "img_path,image,colour\na.png,http://x/a.png,red\n")
    source = manifest(str(path), val=str(path), test=str(path), columns={"image": "img_path"})
    assert source.records["train"][0]["image"] == "a.png"


# --- labels and columns ----------------------------------------------------------------------------------------

def test_no_label_column_or_no_labelled_row_names_the_file(tmp_path):
    records = read_manifest(write(tmp_path / "m.csv", "id,label\n1,red\n2,blue\n"))
    assert error_of(infer_classes, COLOUR, records) == (
        f"{tmp_path / 'm.csv'}: no column 'colour' (the target of task 'colour'; set tasks.colour.target); the "
        f"file has ['id', 'label']")
    records = read_manifest(write(tmp_path / "e.csv", "id,colour\n1,\n2,\n"))
    assert error_of(infer_classes, COLOUR, records) == (
        f"{tmp_path / 'e.csv'}: no row has a label in column 'colour' (the target of task 'colour'); every cell of "
        f"it is empty")
    score = TaskSpec(name="score", type="regression", target="score")
    assert error_of(target_statistics, score, records).startswith(f"{tmp_path / 'e.csv'}: no column 'score'")
    records = read_manifest(write(tmp_path / "one.csv", "id,colour\n1,red\n2,red\n"))
    assert error_of(infer_classes, COLOUR, records).startswith(
        f"{tmp_path / 'one.csv'}: task 'colour' has only the labels ['red'] in column 'colour'")


def test_missing_column_hints_name_the_real_config_keys(tmp_path):
    path = write(tmp_path / "m.csv", "id,colour,image\n1,red,a.png\n")
    message = error_of(check_columns, read_manifest(path), path, [], True, True)
    assert message == (f"{path}: no column 'text' (the text; map yours with data.source.columns.text=COLUMN); the "
                       f"file has ['colour', 'id', 'image']")


# --- images -----------------------------------------------------------------------------------------------------

def decoded(path: Path) -> np.ndarray:
    """The file as the training pipeline decodes it: [H, W, 3] uint8."""
    with Image.open(path) as image:
        return ImageTransform()(image).permute(1, 2, 0).numpy()


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    Image.fromarray(np.array([[0, 257, 1000, 32896, 65535]], dtype=np.uint16)).save(tmp_path / "g.png")
    assert Image.open(tmp_path / "g.png").mode == "I;16"
    assert decoded(tmp_path / "g.png")[0].tolist() == [[v] * 3 for v in (0, 1, 4, 128, 255)]  # value / 257


def test_32_bit_integer_mode_is_read_as_16_bit(tmp_path):
    Image.fromarray(np.array([[-5, 514, 65535, 70000]], dtype=np.int32)).save(tmp_path / "i.tif")
    assert decoded(tmp_path / "i.tif")[0, :, 0].tolist() == [0, 2, 255, 255]


def palette_image(transparent: bool) -> Image.Image:
    image = Image.new("P", (2, 1))
    image.putpalette([10, 20, 30, 200, 100, 50])
    image.putpixel((1, 0), 1)
    if transparent:
        image.info["transparency"] = 1
    return image


@pytest.mark.parametrize("make, expected", [
    (lambda: palette_image(False), [[10, 20, 30], [200, 100, 50]]),
    (lambda: palette_image(True), [[10, 20, 30], [255, 255, 255]]),  # transparent over white
    (lambda: Image.frombytes("LA", (3, 1), bytes([100, 255, 100, 0, 0, 128])), [[100] * 3, [255] * 3, [127] * 3]),
    (lambda: Image.frombytes("RGBA", (2, 1), bytes([10, 20, 30, 255, 10, 20, 30, 0])), [[10, 20, 30], [255] * 3]),
    (lambda: Image.frombytes("L", (2, 1), bytes([0, 77])), [[0] * 3, [77] * 3]),
    (lambda: Image.frombytes("1", (2, 1), bytes([0b01000000])), [[0] * 3, [255] * 3]),
])
def test_image_modes_convert_to_the_rgb_a_viewer_shows(tmp_path, make, expected):
    make().save(tmp_path / "x.png")
    assert decoded(tmp_path / "x.png")[0].tolist() == expected


def test_cmyk_converts_to_rgb(tmp_path):
    Image.frombytes("CMYK", (3, 1), bytes([255, 0, 0, 0, 0, 0, 0, 255, 0, 0, 0, 0])).save(tmp_path / "c.tif")
    assert decoded(tmp_path / "c.tif")[0].tolist() == [[0, 255, 255], [0, 0, 0], [255, 255, 255]]


def exif_rotated(path: Path, **save) -> None:
    """A 3x2 picture, red at its top left, stored with orientation 6 (show it turned 90 degrees clockwise)."""
    image = Image.new("RGB", (3, 2), (0, 0, 0))
    image.putpixel((0, 0), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(path, exif=exif, **save)


def test_exif_orientation_is_applied(tmp_path):
    exif_rotated(tmp_path / "r.png")
    assert decoded(tmp_path / "r.png")[:, :, 0].tolist() == [[0, 255], [0, 0], [0, 0]]  # 2 wide, red top right
    big = Image.new("RGB", (32, 16), (0, 0, 200))
    big.paste((220, 0, 0), (0, 0, 16, 16))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6
    big.save(tmp_path / "r.jpg", exif=exif, quality=95)
    pixels = decoded(tmp_path / "r.jpg").astype(int)
    assert pixels.shape == (32, 16, 3)  # upright: the red half is now on top
    assert abs(pixels[4, 8] - [220, 0, 0]).max() < 8 and abs(pixels[28, 8] - [0, 0, 200]).max() < 8


def test_image_check_sees_the_upright_size(tmp_path):
    exif_rotated(tmp_path / "r.png")
    write(tmp_path / "m.jsonl", '{"image": "r.png", "colour": "red"}\n')
    data = ManifestDataset(read_manifest(tmp_path / "m.jsonl"), tmp_path / "m.jsonl", tmp_path, [COLOUR],
                           ImageTransform())
    assert data.image_size == (2, 3) and tuple(data.batch([0])["image"].shape) == (1, 3, 3, 2)


@pytest.mark.parametrize("side", [8, 12])  # above the limit (Pillow warns), above twice the limit (Pillow raises)
@pytest.mark.parametrize("check_images", [True, False])
def test_image_over_the_pixel_limit_names_file_and_limit(tmp_path, monkeypatch, side, check_images):
    Image.new("RGB", (side, side)).save(tmp_path / "big.png")
    write(tmp_path / "m.jsonl", '{"image": "small.png", "colour": "red"}\n{"image": "big.png", "colour": "red"}\n')
    Image.new("RGB", (4, 4)).save(tmp_path / "small.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)

    def load():
        data = ManifestDataset(read_manifest(tmp_path / "m.jsonl"), tmp_path / "m.jsonl", tmp_path, [COLOUR],
                               ImageTransform(size=4), check_images=check_images)
        data.batch([0, 1])

    where = f"{tmp_path / 'm.jsonl'}, line 2" + (", column 'image'" if check_images else "")
    assert error_of(load) == (f"{where}: image {tmp_path / 'big.png'} has {side * side:,} pixels, more than the limit "
                              f"of 50 (PIL.Image.MAX_IMAGE_PIXELS, a guard against decompression bombs); downscale "
                              f"the file (it is resized to data.image_size anyway)")


def test_missing_image_folder_is_named_once(tmp_path):
    path = write(tmp_path / "m.csv", "image,colour\na.png,red\nb.png,blue\n")
    missing = tmp_path / "pictures"
    assert error_of(manifest, str(path), val=str(path), test=str(path), image_root=str(missing)) == (
        f"data.source.image_root='{missing}' does not exist; relative image paths start there (null: the folder "
        f"of the train manifest)")
    assert error_of(ManifestDataset, read_manifest(path), path, missing, [COLOUR], ImageTransform(),
                    on_bad_sample="skip").startswith(f"{path}: the image folder {missing} does not exist")


def test_to_rgb_leaves_rgb_alone():
    image = Image.new("RGB", (2, 2), (1, 2, 3))
    assert to_rgb(image) is image
