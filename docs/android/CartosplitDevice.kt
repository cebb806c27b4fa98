// cartosplit's device tier in an Android app: tokenize, run the TFLite device graphs with LiteRT, apply the
// bundle's policy, and send the hidden state to the edge server over gRPC when the device is not sure.
//
// NOT COMPILED in the cartosplit repository (no Android toolchain there): read it as a worked example of
// docs/android.md. The tensor names, shapes and dtypes it relies on are the ones tests/test_tflite_signature.py
// checks against exported bundles; the request fields mirror device_runtime/runtime.py.
//
// Gradle (app module):
//   implementation("com.google.ai.edge.litert:litert:2.1.0")          // CompiledModel API
//   implementation("io.grpc:grpc-okhttp:1.76.0")
//   implementation("io.grpc:grpc-kotlin-stub:1.5.0")
//   implementation("io.grpc:grpc-protobuf-lite:1.76.0")
//   implementation("com.google.protobuf:protobuf-kotlin-lite:4.32.1")
//   + the protobuf Gradle plugin generating lite Java/Kotlin and grpc-kotlin stubs from protos/tiers.proto
// (versions: what was current when this was written; any recent ones work).

package org.example.cartosplit

import com.google.ai.edge.litert.Accelerator
import com.google.ai.edge.litert.CompiledModel
import com.google.ai.edge.litert.TensorBuffer
import com.google.protobuf.ByteString
import io.grpc.ManagedChannel
import io.grpc.Metadata
import io.grpc.StatusException
import io.grpc.okhttp.OkHttpChannelBuilder
import cartosplit.v1.EdgeTierGrpcKt
import cartosplit.v1.Tiers.Encoding
import cartosplit.v1.Tiers.InferRequest
import cartosplit.v1.Tiers.Tensor
import java.io.File
import java.nio.ByteBuffer
import java.nio.ByteOrder
import java.security.MessageDigest
import java.text.Normalizer
import java.util.UUID
import java.util.concurrent.TimeUnit
import kotlin.math.exp
import org.json.JSONObject

/** What the bundle's manifest.json says that the device needs. */
class BundleInfo(bundleDir: File) {
    private val manifestBytes = File(bundleDir, "manifest.json").readBytes()
    private val manifest = JSONObject(String(manifestBytes, Charsets.UTF_8))

    /** The lineage id every tier compares (the edge refuses another): a tier bundle's source_bundle (the full
     *  bundle it was cut from), else the sha256 of manifest.json. */
    val bundleId: String = manifest.optString("source_bundle").ifEmpty {
        MessageDigest.getInstance("SHA-256").digest(manifestBytes).joinToString("") { "%02x".format(it) }
    }
    val labels: List<String> = manifest.getJSONObject("model").getJSONArray("labels").let { a ->
        List(a.length()) { a.getString(it) }
    }
    val maxLength = manifest.getJSONObject("model").getInt("max_length")
    val hiddenSize = manifest.getJSONObject("model").getInt("hidden_size")
    val deviceDepth = manifest.getJSONObject("split_points").getInt("device") // d: the edge's entry depth

    // null in the manifest means "never" (a margin) or "never answer here" (alpha): +infinity
    private fun threshold(key: String): Float =
        manifest.getJSONObject("policy").let { if (it.isNull(key)) Float.POSITIVE_INFINITY else it.getDouble(key).toFloat() }
    val alphaDevice = threshold("alpha_device")
    val mediumMargin = threshold("medium_margin")
    val hardMargin = threshold("hard_margin")

    /** Sequence buckets of a TFLite format, and the file of a graph at a bucket. */
    fun buckets(format: String): List<Int> =
        manifest.getJSONObject("formats").getJSONObject(format).getJSONArray("buckets").let { a ->
            List(a.length()) { a.getInt(it) }.sorted()
        }

    fun graphFile(bundleDir: File, graph: String, format: String, bucket: Int): File =
        File(bundleDir, manifest.getJSONObject("graphs").getJSONObject(graph).getJSONObject("files")
            .getJSONObject(format).getString(bucket.toString()))
}

/**
 * BERT WordPiece from the bundle's tokenizer.json (BertNormalizer with lowercase, BertPreTokenizer,
 * WordPiece with "##", [CLS] A [SEP]). Enough for the uncased English BERT/MiniLM vocabularies the kit
 * exports; check it against `tokenizers` on your own data (docs/android.md, "Tokenization").
 */
class WordPieceTokenizer(tokenizerJson: File, private val maxLength: Int) {
    private val vocab: Map<String, Int>
    private val unk: Int
    private val cls: Int
    private val sep: Int

    init {
        val model = JSONObject(tokenizerJson.readText()).getJSONObject("model")
        require(model.getString("type") == "WordPiece") { "expected a WordPiece tokenizer.json" }
        val v = model.getJSONObject("vocab")
        vocab = v.keys().asSequence().associateWith { v.getInt(it) }
        unk = vocab.getValue(model.getString("unk_token"))
        cls = vocab.getValue("[CLS]")
        sep = vocab.getValue("[SEP]")
    }

    private fun isPunctuation(c: Int): Boolean =
        (c in 33..47) || (c in 58..64) || (c in 91..96) || (c in 123..126) ||
            Character.getType(c).let {
                it == Character.CONNECTOR_PUNCTUATION.toInt() || it == Character.DASH_PUNCTUATION.toInt() ||
                    it == Character.START_PUNCTUATION.toInt() || it == Character.END_PUNCTUATION.toInt() ||
                    it == Character.INITIAL_QUOTE_PUNCTUATION.toInt() || it == Character.FINAL_QUOTE_PUNCTUATION.toInt() ||
                    it == Character.OTHER_PUNCTUATION.toInt()
            }

    private fun isChinese(c: Int): Boolean =
        (c in 0x4E00..0x9FFF) || (c in 0x3400..0x4DBF) || (c in 0x20000..0x2A6DF) || (c in 0x2A700..0x2B73F) ||
            (c in 0x2B740..0x2B81F) || (c in 0x2B820..0x2CEAF) || (c in 0xF900..0xFAFF) || (c in 0x2F800..0x2FA1F)

    // as `tokenizers` defines it: categories Cc, Cf, Co, Cn, except tab, newline and carriage return
    private fun isControl(c: Int): Boolean =
        c != '\t'.code && c != '\n'.code && c != '\r'.code && Character.getType(c).let {
            it == Character.CONTROL.toInt() || it == Character.FORMAT.toInt() ||
                it == Character.PRIVATE_USE.toInt() || it == Character.UNASSIGNED.toInt()
        }

    /** BertNormalizer: drop control chars, whitespace -> space, space around CJK, lowercase, strip accents. */
    private fun normalize(text: String): String {
        val out = StringBuilder()
        text.codePoints().forEach { c ->
            when {
                c == 0 || c == 0xFFFD || isControl(c) -> {}
                Character.isWhitespace(c) || Character.isSpaceChar(c) -> out.append(' ')
                isChinese(c) -> out.append(' ').appendCodePoint(c).append(' ')
                else -> out.appendCodePoint(c)
            }
        }
        val decomposed = Normalizer.normalize(out.toString().lowercase(), Normalizer.Form.NFD)
        return decomposed.filter { Character.getType(it) != Character.NON_SPACING_MARK.toInt() }
    }

    /** BertPreTokenizer: split on whitespace, and every punctuation character is a word of its own. */
    private fun words(text: String): List<String> {
        val words = mutableListOf<String>()
        val current = StringBuilder()
        fun flush() { if (current.isNotEmpty()) { words.add(current.toString()); current.clear() } }
        text.codePoints().forEach { c ->
            when {
                Character.isWhitespace(c) -> flush()
                isPunctuation(c) -> { flush(); words.add(String(Character.toChars(c))) }
                else -> current.appendCodePoint(c)
            }
        }
        flush()
        return words
    }

    /** Greedy longest-match-first WordPiece; a word with no match (or over 100 chars) becomes [UNK]. */
    private fun wordPieces(word: String, into: MutableList<Int>) {
        if (word.codePointCount(0, word.length) > 100) { into.add(unk); return }
        val pieces = mutableListOf<Int>()
        var start = 0
        while (start < word.length) {
            var end = word.length
            var found = -1
            while (start < end) {
                val piece = (if (start > 0) "##" else "") + word.substring(start, end)
                val id = vocab[piece]
                if (id != null) { found = id; break }
                end = word.offsetByCodePoints(end, -1)
            }
            if (found < 0) { into.add(unk); return }
            pieces.add(found)
            start = end
        }
        into.addAll(pieces)
    }

    /** Token ids of one text: [CLS] pieces [SEP], truncated to maxLength. Token types are all 0. */
    fun encode(text: String): IntArray {
        val ids = mutableListOf(cls)
        for (w in words(normalize(text))) wordPieces(w, ids)
        val body = ids.take(maxLength - 1)
        return (body + sep).toIntArray()
    }
}

/** One answer, like a line of `cartosplit run`. */
data class Answer(val label: String, val score: Float, val tier: String, val degraded: Boolean)

class CartosplitDevice(
    private val bundleDir: File,
    private val edgeHost: String,
    private val edgePort: Int,
    private val format: String = "tflite-int8",
    private val bearerToken: String? = null, // from secure storage; needs TLS (useTransportSecurity below)
) : AutoCloseable {
    private val info = BundleInfo(bundleDir)
    private val tokenizer = WordPieceTokenizer(File(bundleDir, "tokenizer.json"), info.maxLength)
    private val buckets = info.buckets(format)
    private val head = buckets.associateWith { compile("device_head", it) }
    private val tail = buckets.associateWith { compile("device_tail", it) }
    private val channel: ManagedChannel = OkHttpChannelBuilder.forAddress(edgeHost, edgePort)
        .apply { if (bearerToken != null) useTransportSecurity() else usePlaintext() }
        .maxInboundMessageSize(16 shl 20)
        .build()
    private val edge = EdgeTierGrpcKt.EdgeTierCoroutineStub(channel)

    private fun compile(graph: String, bucket: Int): CompiledModel =
        CompiledModel.create(info.graphFile(bundleDir, graph, format, bucket).path, CompiledModel.Options(Accelerator.CPU))

    /** Runs one fixed-shape graph by signature names (args_i in, output_i out); returns output_0, output_1. */
    private fun run(model: CompiledModel, inputs: List<(TensorBuffer) -> Unit>): List<FloatArray> {
        val sig = "serving_default"
        val ins = inputs.indices.associate { i -> "args_$i" to model.createInputBuffer("args_$i", sig).also(inputs[i]) }
        val outs = (0..1).associate { i -> "output_$i" to model.createOutputBuffer("output_$i", sig) }
        try {
            model.run(ins, outs, sig)
            return listOf(outs.getValue("output_0").readFloat(), outs.getValue("output_1").readFloat())
        } finally {
            ins.values.forEach { it.close() }
            outs.values.forEach { it.close() }
        }
    }

    private fun softmax(z: FloatArray): FloatArray {
        val m = z.max()
        val e = z.map { exp((it - m).toDouble()) }
        val s = e.sum()
        return FloatArray(z.size) { (e[it] / s).toFloat() }
    }

    suspend fun classify(text: String): Answer {
        val ids = tokenizer.encode(text)
        val length = ids.size
        val bucket = buckets.firstOrNull { it >= length } ?: error("no bucket holds $length tokens")
        val h = info.hiddenSize
        val paddedIds = IntArray(bucket).also { ids.copyInto(it) }      // pad id 0
        val mask = IntArray(bucket) { if (it < length) 1 else 0 }       // zeros hide the padding
        val types = IntArray(bucket)                                     // single sentence: all 0

        // device_head: router logits [1, 3] (easy, medium, hard) and the hidden state at depth r [1, S, H]
        val (routerLogits, hiddenR) = run(head.getValue(bucket), listOf(
            { it.writeInt(paddedIds) }, { it.writeInt(mask) }, { it.writeInt(types) }))
        val router = softmax(routerLogits)
        // device_tail: hidden state at depth d [1, S, H] and the device exit's logits [1, K]
        val (hiddenD, deviceLogits) = run(tail.getValue(bucket), listOf(
            { it.writeFloat(hiddenR) }, { it.writeInt(mask) }))
        val probs = softmax(deviceLogits)
        val best = probs.indices.maxBy { probs[it] }

        // the policy (device_runtime/policy.py). A hard input (router[2] >= hardMargin) would go straight to
        // the cloud from depth r; this example sends it to the edge instead, which forwards what it cannot answer.
        val confident = probs[best] >= info.alphaDevice
        val medium = router[1] >= info.mediumMargin
        if (router[2] < info.hardMargin && confident && !medium) {
            return Answer(info.labels[best], probs[best], "device", degraded = false)
        }

        // the edge: the hidden state at depth d of the REAL tokens only ([S, H], padding cut), as FP16
        val fp16 = ByteBuffer.allocate(length * h * 2).order(ByteOrder.LITTLE_ENDIAN)
        for (i in 0 until length * h) fp16.putShort(android.util.Half.toHalf(hiddenD[i])) // API 26+
        val request = InferRequest.newBuilder()
            .setRequestId(UUID.randomUUID().toString().replace("-", "")) // keep it for a retry: replies are cached
            .setBundleId(info.bundleId)
            .setProtocolVersion(1)
            .setDepth(info.deviceDepth)
            .setHidden(Tensor.newBuilder().setData(ByteString.copyFrom(fp16.array()))
                .setEncoding(Encoding.FP16).addShape(length.toLong()).addShape(h.toLong()))
            .build()
        val headers = Metadata().apply {
            if (bearerToken != null) put(Metadata.Key.of("authorization", Metadata.ASCII_STRING_MARSHALLER), "Bearer $bearerToken")
        }
        return try {
            val reply = edge.withDeadlineAfter(2, TimeUnit.SECONDS).infer(request, headers)
            val tier = when (reply.tier.number) { 2 -> "edge"; 3 -> "cloud"; else -> "unknown" }
            Answer(info.labels[reply.label], reply.getProbabilities(reply.label), tier, reply.degraded)
        } catch (e: StatusException) {
            // edge unreachable, too slow, or refusing: answer from the device's own exit, marked degraded
            Answer(info.labels[best], probs[best], "device", degraded = true)
        }
    }

    override fun close() {
        channel.shutdown()
        (head.values + tail.values).forEach { it.close() }
    }
}
