"""The pages stage of the page-extraction track: PDF pages rendered to images, each with its JSON fields (from the
user's labels or from the page's text layer), split by document, with augmented copies in the training split."""
