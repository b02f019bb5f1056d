"""The only home of other projects' private APIs: one module per library, each use with its
reason, an upstream link and a version guard that fails loudly outside the tested range."""
