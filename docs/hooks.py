"""mkdocs hook: the loss table and the loss count are generated from the registry, never typed by hand."""

from trl_dpo_plus.losses import get_loss, list_losses

MARKER = "<!-- loss-table -->"
COUNT = "<!-- loss-count -->"


def loss_table() -> str:
    rows = ["| loss | data | formula | reference-free | defaults | when to use | paper |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in list_losses():
        spec = get_loss(name)
        defaults = ", ".join(f"{k}={v}" for k, v in spec.defaults.items())
        paper = f"[arXiv]({spec.paper})" if spec.paper else ""
        formula = spec.formula.replace("|", "\\|")
        rows.append(f"| `{name}` | {spec.data} | {formula} | {'yes' if not spec.requires_reference else 'no'} | {defaults} | "
                    f"{spec.use_when} | {paper} |")
    return "\n".join(rows)


def on_page_markdown(markdown, **kwargs):
    markdown = markdown.replace(COUNT, str(len(list_losses())))
    return markdown.replace(MARKER, loss_table()) if MARKER in markdown else markdown
