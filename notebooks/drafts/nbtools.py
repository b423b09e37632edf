import nbformat
from nbformat.v4 import new_notebook, new_markdown_cell, new_code_cell

def build(cells, path):
    nb = new_notebook()
    out = []
    for kind, src, *tags in cells:
        if kind == "md":
            out.append(new_markdown_cell(src.strip("\n")))
        else:
            c = new_code_cell(src.strip("\n"))
            if tags:
                c.metadata["tags"] = list(tags)
            out.append(c)
    nb.cells = out
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nb.metadata["language_info"] = {"name": "python"}
    nbformat.write(nb, path)
