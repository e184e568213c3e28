"""`raylm report`: the artifacts a command wrote -> one self-contained page.

write (which kind of directory) -> run | sweep | tune | baselines | tokenizers | mup_check (title, sections of
blocks, results) -> render (HTML with inlined PNGs, Markdown) ; plots (run and search figures); interpret
(``raylm interpret``'s page); privacy (the privacy audit's section of a run's report)
"""
