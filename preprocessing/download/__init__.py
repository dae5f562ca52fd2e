"""`python -m preprocessing download`: the CVDF Kinetics release onto a local disk, in the layout
`python -m preprocessing kinetics` reads.

release.py      where the CVDF release keeps each version's part lists and annotations
fetch.py        one URL -> one local file: resumable (HTTP Range), retried with backoff, size-checked
extract.py      one .tar.gz part -> a folder, member by member, refusing what could escape or mislead
annotations.py  the release's annotation files -> the CSV `preprocessing kinetics` reads
kinetics.py     one split end to end: list, download and extract parts in parallel, replacements, report
"""
