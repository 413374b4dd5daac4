"""vgclip's tests: one folder per package of vgclip/, end-to-end runs in e2e/."""
