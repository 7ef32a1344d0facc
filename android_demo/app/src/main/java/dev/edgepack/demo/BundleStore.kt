package dev.edgepack.demo

import android.content.Context
import android.net.Uri
import androidx.documentfile.provider.DocumentFile
import dev.edgepack.bundlekit.BundleException
import java.io.File

/**
 * Where bundles live on the device. The runtimes open files by path, and a folder picked with the system picker
 * is a content URI, so a picked bundle is copied into the app's own storage first (then [dev.edgepack.bundlekit.Bundle.open]
 * checks every file's sha256 against the manifest, so a bad copy is caught). Bundles pushed with adb go to the
 * app's external files folder, which needs no permission:
 * `adb push BUNDLE /sdcard/Android/data/dev.edgepack.demo/files/bundles/`.
 */
class BundleStore(private val context: Context) {
    private val importedRoot = File(context.filesDir, "bundles")

    /** The adb push target (null while shared storage is unavailable). */
    val pushedRoot: File? = context.getExternalFilesDir("bundles")

    /** Bundle folders already on the device: imported ones, then pushed ones. */
    fun bundles(): List<File> = listOfNotNull(importedRoot, pushedRoot).flatMap { root ->
        root.listFiles()?.filter { it.isDirectory && !it.name.startsWith(".") }?.sortedBy { it.name } ?: emptyList()
    }

    /** Copy the picked folder into app storage (replacing an earlier import of the same name); returns it. */
    fun import(tree: Uri): File {
        val root = DocumentFile.fromTreeUri(context, tree)
            ?: throw BundleException("cannot open the picked folder", "pick the folder again")
        val name = checkedName(root.name ?: "bundle")
        importedRoot.mkdirs()
        val staging = File(importedRoot, ".$name.partial")
        staging.deleteRecursively()
        try {
            copyTree(root, staging)
            val destination = File(importedRoot, name)
            destination.deleteRecursively()
            if (!staging.renameTo(destination)) {
                throw BundleException("cannot move the copied bundle to $destination", "free some space and try again")
            }
            return destination
        } finally {
            staging.deleteRecursively()
        }
    }

    private fun copyTree(folder: DocumentFile, into: File) {
        if (!into.mkdirs() && !into.isDirectory) {
            throw BundleException("cannot create $into", "free some space and try again")
        }
        for (child in folder.listFiles()) {
            val name = child.name ?: continue
            if (name.startsWith(".")) continue  // hidden entries (.DS_Store) are not part of a bundle
            val target = File(into, checkedName(name))
            when {
                child.isDirectory -> copyTree(child, target)
                child.isFile -> {
                    val input = context.contentResolver.openInputStream(child.uri)
                        ?: throw BundleException("cannot read $name in the picked folder", "pick the folder again")
                    input.use { source -> target.outputStream().use { source.copyTo(it, 1 shl 20) } }
                }
                else -> throw BundleException("$name in the picked folder is not a plain file",
                    "a bundle holds only plain files: re-export it")
            }
        }
    }

    private fun checkedName(name: String): String {
        if (name.isEmpty() || name == "." || name == ".." || '/' in name || '\u0000' in name) {
            throw BundleException("the picked folder holds an entry named '$name'", "pick the folder that `edgepack export` wrote")
        }
        return name
    }
}
