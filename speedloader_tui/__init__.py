"""speedloader-tui: the Textual dashboard of speedloaderd (terminal and browser)."""
