"""evaluate.py's checks and its simulation of DecDEC's runtime."""
