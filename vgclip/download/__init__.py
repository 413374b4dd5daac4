"""`vgclip download`: fetch the real datasets (Visual Genome, Pascal VOC) into the layouts the readers expect.

sources.py  the one table of archives (URL, size, checksum, what each archive installs)
fetch.py    HTTP download with range resume, retries with backoff and a progress bar
verify.py   size / checksum / archive-integrity checks; a bad file is renamed aside
extract.py  safe extraction (tar data filter, zip path sanitising) with a free-space check
install.py  the whole run: download, verify, extract into a hidden staging folder, rename into place

Only the standard library and tqdm are used, so `import vgclip.download` stays light.
"""
