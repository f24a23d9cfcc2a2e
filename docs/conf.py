# Sphinx configuration of the documentation site; docs/build.py stages it with the processed notebooks and the guides.
project = "mlnb"
author = "mlnb maintainers"
extensions = ["myst_nb"]
exclude_patterns = ["_build", "**.ipynb_checkpoints", "benchmarks/**"]   # benchmark figures are included by the guides

# The notebooks are rendered with the outputs stored in them: the book runs in `nbdev-test`, not again here.
nb_execution_mode = "off"
nb_render_markdown_format = "myst"            # show_doc output is markdown with tables and code blocks
nb_output_stderr = "remove"                   # warnings printed while the examples ran are not part of the book
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 4
suppress_warnings = ["myst.header"]           # notebooks start sections at ## under the page title, by design

html_theme = "sphinx_book_theme"
html_title = "mlnb"
html_theme_options = {
    "show_navbar_depth": 1,
    "show_toc_level": 2,
    "home_page_in_toc": True,
    "use_download_button": False,
    "use_fullscreen_button": False,
}
html_static_path = ["_static"]
html_css_files = ["mlnb.css"]
html_show_sourcelink = False
html_copy_source = False
