"""Where the project leans on other projects' private APIs: one module per library, each use
with its reason, the upstream issue and a version guard that fails loudly outside the range it
was written for."""
