"""Reading every supported input kind, cutting pieces, and the bad inputs of the readers."""

from __future__ import annotations

import gzip
import json
import lzma

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from data_prep.corpus import ReadOptions, ReadStats, plan_pieces, read_documents
from data_prep.errors import UserError
from data_prep.inputs import expand_inputs


def documents(paths, options=ReadOptions(), piece_bytes=None, stats=None):
    stats = stats if stats is not None else ReadStats()
    pieces = plan_pieces(expand_inputs([str(p) for p in paths]), options, piece_bytes)
    return [doc for piece in pieces for doc in read_documents(piece, options, stats)]


@pytest.fixture(scope="module")
def reference_docs(wikitext_valid) -> list[str]:
    docs = [line.strip() for line in wikitext_valid.read_text(encoding="utf-8").splitlines()]
    return [d for d in docs if d][:400]


def test_every_input_kind_yields_the_same_documents(tmp_path, reference_docs):
    import datasets

    docs = reference_docs
    (tmp_path / "a.txt").write_text("\n".join(docs) + "\n", encoding="utf-8")
    (tmp_path / "b.txt").write_text("\n\n".join(d.replace(" . ", " .\n") for d in docs) + "\n", encoding="utf-8")
    jsonl = "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)).encode()
    (tmp_path / "c.jsonl").write_bytes(jsonl)
    with gzip.open(tmp_path / "d.jsonl.gz", "wb") as f:
        f.write(jsonl)
    with lzma.open(tmp_path / "e.txt.xz", "wb") as f:
        f.write(("\n".join(docs) + "\n").encode())
    (tmp_path / "f.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl))
    pq.write_table(pa.table({"body": docs}), tmp_path / "g.parquet", row_group_size=100)
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "h_dataset"))
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": docs[:150]}),
            "test": datasets.Dataset.from_dict({"text": docs[150:]}),
        }
    ).save_to_disk(str(tmp_path / "i_dict"))

    assert documents([tmp_path / "a.txt"]) == docs
    blank = documents([tmp_path / "b.txt"], ReadOptions(txt_docs="blank"))
    assert [d.replace(" .\n", " . ") for d in blank] == docs
    for name in ("c.jsonl", "d.jsonl.gz", "f.jsonl.zst", "h_dataset", "i_dict"):
        assert documents([tmp_path / name]) == docs, name
    assert documents([tmp_path / "e.txt.xz"]) == docs
    assert documents([tmp_path / "g.parquet"], ReadOptions(text_field="body")) == docs
    assert len(plan_pieces(expand_inputs([str(tmp_path / "g.parquet")]), ReadOptions(text_field="body"), None)) == 4


def test_directories_and_globs_expand_in_sorted_order(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "2.txt").write_text("two\n")
    (tmp_path / "sub" / "1.txt").write_text("one\n")
    (tmp_path / "sub" / ".hidden").write_text("hidden\n")
    (tmp_path / "0.txt").write_text("zero\n")
    assert documents([tmp_path]) == ["zero", "one", "two"]
    assert documents([tmp_path / "sub" / "*.txt"]) == ["one", "two"]
    assert documents([str(tmp_path / "**" / "*.txt")]) == ["zero", "one", "two"]


@pytest.mark.parametrize("txt_docs", ["line", "blank"])
@pytest.mark.parametrize("piece_bytes", [4096, 10_000, 77_777])
def test_pieces_partition_the_documents_exactly(tmp_path, wikitext_valid, txt_docs, piece_bytes):
    text = wikitext_valid.read_bytes()[:300_000]
    text = b"\xef\xbb\xbf" + text.replace(b"\n", b"\r\n")  # BOM and Windows line ends
    path = tmp_path / "corpus.txt"
    path.write_bytes(text)
    options = ReadOptions(txt_docs=txt_docs)
    pieces = plan_pieces(expand_inputs([str(path)]), options, piece_bytes)
    assert len(pieces) > 3
    assert [p.start for p in pieces[1:]] == [p.end for p in pieces[:-1]]
    assert documents([path], options, piece_bytes) == documents([path], options, None)
    assert not documents([path], options)[0].startswith("\ufeff")


def test_empty_lines_are_counted_not_returned(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("one\n\n   \ntwo\n")
    stats = ReadStats()
    assert documents([path], stats=stats) == ["one", "two"]
    assert (stats.documents, stats.empty_documents) == (2, 2)


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"good line\ncaf\xe9 and \xff\xfe bytes\nkept \xef\xbf\xbd char\n")
    stats = ReadStats()
    docs = documents([path], stats=stats)
    assert docs == ["good line", "caf\ufffd and \ufffd\ufffd bytes", "kept \ufffd char"]
    assert stats.replaced_characters == 3


def test_invalid_utf8_can_fail_with_file_and_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"".join(b"line %d\n" % i for i in range(5000)) + b"caf\xe9\n")
    with pytest.raises(UserError, match=rf"^{path}:5001: invalid UTF-8 \(byte 0xe9 at column 4\)"):
        documents([path], ReadOptions(utf8_errors="fail"), piece_bytes=4096)


def test_jsonl_line_that_is_not_json_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(3000)) + "{not json\n")
    with pytest.raises(UserError, match=rf"^{path}:3001: not valid JSON"):
        documents([path], piece_bytes=4096)


def test_jsonl_line_without_the_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"body": "elsewhere"}\n')
    with pytest.raises(UserError, match=rf"^{path}:2: no field 'text'; set --text-field"):
        documents([path])
    path.write_text('{"text": ["not", "a", "string"]}\n')
    with pytest.raises(UserError, match=rf"^{path}:1: field 'text' is list, not a string"):
        documents([path])


def test_parquet_without_the_column(tmp_path):
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"body": ["a"]}), path)
    with pytest.raises(UserError, match=r"no column 'text' \(columns: body\); set --text-field"):
        documents([path])


def test_binary_file_is_refused(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)))
    with pytest.raises(UserError, match=rf"^{path}:1: binary file \(NUL byte at column 8\); expected UTF-8 text$"):
        documents([path])


@pytest.mark.parametrize("offset", [128, 2_000_000])
def test_a_nul_byte_anywhere_refuses_a_text_file_naming_its_line(tmp_path, offset):
    """One rule wherever the NUL is: the start of the file (checked before any work) or 2 MB in (was accepted)."""
    path = tmp_path / "corpus.txt"
    text = bytearray(b"".join(b"line %07d\n" % i for i in range(offset // 13 + 10)))
    text[offset] = 0
    path.write_bytes(bytes(text))
    line, column = text.count(b"\n", 0, offset) + 1, offset - text.rfind(b"\n", 0, offset)
    with pytest.raises(UserError, match=rf"^{path}:{line}: binary file \(NUL byte at column {column}\)"):
        documents([path], piece_bytes=1 << 20)


HUGE = "word " * ((16 << 20) // 5 + 1)  # just over 16 MiB, the most a document may be


@pytest.mark.parametrize("kind", ["txt", "jsonl", "blank", "parquet"])
def test_a_document_over_16_mib_is_refused_naming_where_it_is(tmp_path, kind):
    """Tokenizing one such document alone takes gigabytes (a 200 MB line: 9.9 GB); it was accepted."""
    if kind == "parquet":
        path = tmp_path / "corpus.parquet"
        pq.write_table(pa.table({"text": ["short", HUGE, "short"]}), path)
        where, options = rf"{path}: row 1 of row group 0: column 'text'", ReadOptions()
    elif kind == "blank":
        path = tmp_path / "corpus.txt"
        path.write_text(
            "a short document\n\n" + "\n".join(HUGE[i : i + 1000] for i in range(0, len(HUGE), 1000)) + "\n"
        )
        where, options = (
            rf"{path}:\d+: the blank-line separated document ending after this line",
            ReadOptions(txt_docs="blank"),
        )
    else:
        path = tmp_path / f"corpus.{kind}"
        lines = (
            ["short", HUGE, "short"] if kind == "txt" else [json.dumps({"text": t}) for t in ("short", HUGE, "short")]
        )
        path.write_text("\n".join(lines) + "\n")
        where, options = rf"{path}:2: this line", ReadOptions()
    with pytest.raises(UserError, match=rf"^{where} is longer than 16 MiB, the most a document may be"):
        documents([path], options)


def test_missing_path_and_empty_glob(tmp_path):
    with pytest.raises(UserError, match=rf"^{tmp_path / 'nope.txt'}: no such file or directory$"):
        expand_inputs([str(tmp_path / "nope.txt")])
    with pytest.raises(UserError, match="no files match this pattern"):
        expand_inputs([str(tmp_path / "*.jsonl")])


def broken_compressed_files(directory) -> dict[str, bytes]:
    import lzma

    text = b"hello world\n" * 20000
    gz, xz, zst = gzip.compress(text), lzma.compress(text), zstandard.ZstdCompressor().compress(text)
    return {
        "not-gzip.txt.gz": b"plain text, not gzip\n",
        "truncated.txt.gz": gz[: len(gz) // 2],
        "truncated.txt.xz": xz[: len(xz) // 2],
        "corrupt.txt.zst": zst[:10] + b"\x00garbage" + zst[20:],
    }


@pytest.mark.parametrize("name", ["not-gzip.txt.gz", "truncated.txt.gz", "truncated.txt.xz", "corrupt.txt.zst"])
def test_a_damaged_compressed_file_is_one_line_naming_it(tmp_path, name):
    """It was the decompressor's traceback (BadGzipFile, EOFError, ZstdError), exit 1."""
    path = tmp_path / name
    path.write_bytes(broken_compressed_files(tmp_path)[name])
    kind = {"gz": "gzip", "xz": "xz", "zst": "zstd"}[name.rsplit(".", 1)[1]]
    with pytest.raises(UserError, match=rf"^{path}: not a valid {kind} file: .+ \(reading from decompressed byte 0\)$"):
        documents([path])
