"""The panes of the dashboard's tabs and their parts."""
