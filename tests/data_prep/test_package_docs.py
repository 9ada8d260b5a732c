"""The Debian documentation corpus: markup removed, code and tables dropped, duplicates and any text
sharing a 13-word n-gram with the excluded (wikitext) file kept out, deterministic; on the installed
packages when they are there."""
import gzip
import json
import pathlib

import pytest

from data_prep import package_docs as pd

RST = """\
Memory management
=================

The kernel keeps a list of free pages for every zone, and the page allocator takes pages from the
zone that fits the request best. See :ref:`the allocator <page_alloc>` and ``alloc_pages()`` for details.

An example::

    struct page *page = alloc_pages(GFP_KERNEL, 0);
    if (!page) return -ENOMEM;

    more_code_after_a_blank_line();

.. note::

    This admonition is skipped with its indented body, although it reads like prose text.

- A list item that is long enough to count as a prose paragraph on its own, with *emphasis* here.

+--------+--------+
| a      | table  |
+--------+--------+

Short line.
"""

POD = """\
=head1 NAME

perlfoo - an example of the plain old documentation format for the tests

=head1 DESCRIPTION

Perl keeps its B<documentation> in POD, where C<formatting codes> such as L<perlpod|perlpod> and
I<italics> are removed, and ordinary paragraphs are kept as the prose they are.

    my $code = "verbatim paragraphs are code and are dropped";
    print $code;

=begin html

<p>Data blocks for other formatters are dropped as a whole, even if they hold many words like this.</p>

=end html

=over 4

=item The text of an item is kept when it reads as a sentence of at least eight words.

=back
"""

HELD_OUT = ("The quick brown fox jumps over the lazy dog while the sleepy cat watches from the old wooden fence "
            "near the river bank in spring")


def test_rst_keeps_prose_without_markup_and_drops_code_directives_and_tables():
    paragraphs = [p for p in pd.rst_paragraphs(RST) if pd.is_prose(p)]
    assert paragraphs == [
        "The kernel keeps a list of free pages for every zone, and the page allocator takes pages from the zone "
        "that fits the request best. See the allocator and alloc_pages() for details.",
        "A list item that is long enough to count as a prose paragraph on its own, with emphasis here."]


def test_pod_keeps_ordinary_paragraphs_and_items_without_formatting_codes():
    paragraphs = [p for p in pd.pod_paragraphs(POD) if pd.is_prose(p)]
    assert paragraphs == [
        "perlfoo - an example of the plain old documentation format for the tests",
        "Perl keeps its documentation in POD, where formatting codes such as perlpod and italics are removed, and "
        "ordinary paragraphs are kept as the prose they are.",
        "The text of an item is kept when it reads as a sentence of at least eight words."]


def test_prose_filter_rejects_code_symbols_short_lines_and_non_ascii():
    assert pd.is_prose("This sentence is plain English prose with enough words in it.")
    assert not pd.is_prose("Too short to be a paragraph.")
    assert not pd.is_prose("if (x == 1) { y = x; } else { return -EINVAL; } /* not prose at all here */")
    assert not pd.is_prose("Dieser Satz ist auf Deutsch geschrieben und enthält Umlaute wie ä und ö.")


def _fake_root(tmp_path: pathlib.Path, held_out_copy: str) -> pathlib.Path:
    """A file-system root with two kernel documents and one POD file, as the packages lay them out."""
    docs = tmp_path / "root" / "usr/share/doc/linux-doc-6.1/Documentation"
    (docs / "mm").mkdir(parents=True)
    (docs / "translations").mkdir()
    (docs / "mm" / "a.rst.gz").write_bytes(gzip.compress(RST.encode()))
    (docs / "mm" / "b.rst.gz").write_bytes(gzip.compress((RST + "\n" + held_out_copy + "\n").encode()))
    (docs / "translations" / "c.rst.gz").write_bytes(gzip.compress(b"A translated page that must be skipped entirely "
                                                                   b"because it sits in the translations folder."))
    pod = tmp_path / "root" / "usr/share/perl/5.36.0/pod"
    pod.mkdir(parents=True)
    (pod / "perlfoo.pod").write_text(POD)
    (tmp_path / "root" / "usr/share/perl/5.36").symlink_to("5.36.0")      # as Debian ships it: read once
    return tmp_path / "root"


def test_corpus_is_deduplicated_excludes_held_out_ngrams_and_is_deterministic(tmp_path):
    # the held-out text appears in b.rst in wikitext's tokenisation, which the normal form sees through
    wikitext_style = "The quick brown fox jumps over the lazy dog while the sleepy cat watches from the old " \
                     "wooden fence near the river bank in spring , said the narrator @-@ again ."
    root = _fake_root(tmp_path, wikitext_style)
    docs, stats = pd.package_docs(root, [HELD_OUT])
    assert stats["linux-doc-6.1"]["files"] == 2 and stats["perl-doc"]["files"] == 1
    assert stats["linux-doc-6.1"]["duplicates"] == 2                     # b.rst repeats a.rst's two paragraphs
    assert stats["linux-doc-6.1"]["excluded"] == 1                       # the held-out copy
    assert stats["python3.11-doc"]["files"] == 0
    assert len(docs) == 2 and "quick brown fox" not in "".join(docs) and "translated" not in "".join(docs)
    assert (docs, stats) == pd.package_docs(root, [HELD_OUT])
    out = tmp_path / "out.jsonl"
    assert pd.main([str(out), "--root", str(root), "--keep-embedded-overlap"]) == 0
    assert [json.loads(line)["text"] for line in out.read_text().splitlines()] == pd.package_docs(root)[0]
    assert json.loads(pathlib.Path(f"{out}.stats.json").read_text())["documents"] == 3   # nothing excluded now


INSTALLED = pathlib.Path("/usr/share/perl")


@pytest.mark.skipif(not any(INSTALLED.glob("5.*/pod/perlintro.pod")), reason="perl-doc is not installed")
def test_installed_perl_doc_gives_prose_clear_of_the_wikitext_file(shared_data):
    """A cheap slice of the real source (perl's introduction pages), checked against the real held-out file."""
    package = pd.Package("perl-doc", "", "usr/share/perl", ("5.*/pod/perlintro.pod", "5.*/pod/perlsyn.pod"), "pod")
    wikitext = pd.read_jsonl_texts(shared_data / "wikitext" / "wikitext_document_level-test.json")
    docs, stats = pd.package_docs("/", wikitext, packages=(package,))
    assert stats["perl-doc"]["files"] == 2 and stats["perl-doc"]["kept_bytes"] > 20_000
    held_out = pd.ngram_hashes(pd.normal_words(" ".join(wikitext)))
    for doc in docs:
        assert held_out.isdisjoint(pd.ngram_hashes(pd.normal_words(doc)))
        assert all(pd.is_prose(p) for p in doc.split("\n\n"))
